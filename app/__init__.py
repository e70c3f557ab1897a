"""molcloak's Gradio app: the client side of a private prediction, in the browser.

`backend.AppBackend` does the work (sessions, keys, encrypt, run over HTTP, decrypt, batches),
`compare.Comparison` the owner's plaintext comparison in a child process, `views` the text the page
shows, `ui.build_ui` and `batch.batch_tab` draw the page, `launcher.run_app` starts the server and the page.
"""
