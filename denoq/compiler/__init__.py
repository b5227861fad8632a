"""The compiler: recipes, model loading, the stage pipeline, artifacts and the CLI (top layer; only orchestrates)."""
