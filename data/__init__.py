"""Datasets, view augmentations and loaders. Imports nothing from pretrain/, eval_probes/ or launch/."""
from .augment import ViewAugment, ViewSpec, eval_transform, multicrop_specs, view_specs
from .datasets import (DataError, DatasetInfo, ImageFolderDataset, TensorImageDataset, build_dataset,
                       list_datasets, load_image, register_dataset)
from .loader import EvalCollate, SkipCounter, StepBatchSampler, ViewCollate, eval_loader, train_loader

__all__ = ["ViewAugment", "ViewSpec", "eval_transform", "multicrop_specs", "view_specs", "DataError", "DatasetInfo",
           "ImageFolderDataset", "TensorImageDataset", "build_dataset", "list_datasets", "load_image",
           "register_dataset", "EvalCollate", "SkipCounter", "StepBatchSampler", "ViewCollate",
           "eval_loader", "train_loader"]
