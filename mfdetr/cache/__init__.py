"""The Zarr cache: schema, writer (extract), reader (torch Dataset), fingerprints, info/verify."""
