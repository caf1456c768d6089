from datamodules.ehr import EHRDataModule, EHRDataset, collate_samples
from datamodules.trajectories import TrajectoryDataModule

__all__ = ["EHRDataModule", "EHRDataset", "TrajectoryDataModule", "collate_samples"]
