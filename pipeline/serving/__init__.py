"""HTTP deployment of the FHE server half: the FastAPI app (http_api), the FHE executor behind it
(executor: worker processes), the evaluation-key store (keystore), the HTTP client (http_client) and
the routine that starts a server process and waits for it (process)."""
