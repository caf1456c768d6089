from lightning_modules.concare import ConCareModule
from lightning_modules.prompting import PromptingModule

__all__ = ["ConCareModule", "PromptingModule"]
