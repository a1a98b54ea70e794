"""Python package that the bundle's configs instantiate: networks, transforms, losses and engine glue."""
