from datamodules.ehr import EHRDataModule, EHRDataset, collate_samples

__all__ = ["EHRDataModule", "EHRDataset", "collate_samples"]
