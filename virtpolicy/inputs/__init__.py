"""Read-only typed views of the outside world: domain XML, host bundle, osinfo-db, host devices, schemas."""
