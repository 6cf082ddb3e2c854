"""Model hub client: TUF-verified fetching and the content-addressed model store."""
