"""The bundle's own tooling (not shipped inside the bundle zip): ``python -m bundle <verb>``."""
