from lightning_modules.concare import ConCareModule

__all__ = ["ConCareModule"]
