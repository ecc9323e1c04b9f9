"""The REST service (`virtpolicy serve`, docs/rest.md): an optional extra, `pip install 'virtpolicy[server]'`.

`create_app(Settings(...))` returns the FastAPI application; `virtpolicy.server.app` imports FastAPI,
this package does not, so `virtpolicy serve` can say in one line what is missing.
"""
