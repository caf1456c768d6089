from lightning_modules.concare import ConCareModule
from lightning_modules.distill import DistillModule, TrajectoryWriter
from lightning_modules.prompting import PromptingModule
from lightning_modules.rl import RLModule
from lightning_modules.sft import SFTModule

__all__ = ["ConCareModule", "DistillModule", "PromptingModule", "RLModule", "SFTModule", "TrajectoryWriter"]
