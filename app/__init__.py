"""molcloak's Gradio app: the client side of a private prediction, in the browser.

`backend.AppBackend` does the work (sessions, keys, encrypt, run over HTTP, decrypt),
`ui.build_ui` draws the page, `launcher.run_app` starts the FHE server and the page.
"""
