from datamodules.ehr import EHRDataModule, EHRDataset
from datamodules.trajectories import TrajectoryDataModule
from eagrl.data.batch import collate_samples

__all__ = ["EHRDataModule", "EHRDataset", "TrajectoryDataModule", "collate_samples"]
