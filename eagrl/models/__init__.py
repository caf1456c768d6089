from eagrl.models.concare import ConCare, decov_loss

__all__ = ["ConCare", "decov_loss"]
