"""The REST service (`virtpolicy serve`, docs/rest.md): an optional extra, `pip install 'virtpolicy[server]'`.

`virtpolicy.server.app.create_app(Settings(...))` returns the FastAPI application. The HTTP side is
`api` (the only module that imports FastAPI, after the workers' zygote has started); `pool` runs the
workers from the server's event loop; `worker` is the code of the zygote and of the workers; `models`
holds the request and answer bodies (pydantic). This package imports none of them.
"""
