from lightning_modules.concare import ConCareModule
from lightning_modules.distill import DistillModule, TrajectoryWriter
from lightning_modules.prompting import PromptingModule

__all__ = ["ConCareModule", "DistillModule", "PromptingModule", "TrajectoryWriter"]
