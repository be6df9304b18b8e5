"""The web server: the FastAPI app, its review API, its guards and limits, and the server that runs it.

Its public names are its modules, imported where they are used, not here: `import bloodcell.serve` stays light.
"""

__all__ = ["app", "guards", "limits", "review_api", "schemas", "server", "uploads"]
