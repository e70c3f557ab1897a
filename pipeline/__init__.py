"""molcloak.pipeline: data -> features -> train -> compile -> bundle -> client/server."""
