"""Datasets: records (paths) for folders, Kvasir, CVC-ClinicDB, BCV/Synapse volumes and AMOS-style slices."""

from imedsam_train.data.boxes import jitter_box, mask_box, stable_seed
from imedsam_train.data.folder import cvc_dataset, folder_dataset, kvasir_dataset, read_kvasir_boxes
from imedsam_train.data.records import Dataset, Record, Sample, read_split

__all__ = [
    "Dataset", "Record", "Sample", "cvc_dataset", "folder_dataset", "jitter_box", "kvasir_dataset",
    "mask_box", "read_kvasir_boxes", "read_split", "stable_seed",
]
