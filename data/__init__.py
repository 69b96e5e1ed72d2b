"""Datasets, view augmentations and loaders. Imports nothing from pretrain/, eval_probes/ or launch/."""
from .augment import ViewAugment, ViewSpec, eval_transform, multicrop_specs, view_specs
from .datasets import (DataError, DatasetInfo, ImageFolderDataset, TensorImageDataset, build_dataset,
                       list_datasets, load_image, register_dataset)
from .masking import MASK_KINDS, MaskError, MaskGenerator, beit_block_mask, beit_num_masked, inverse_block_mask
from .loader import (EvalCollate, PairCollate, SkipCounter, StepBatchSampler, ViewCollate, ZippedLoader, batch_len,
                     eval_loader, own_generator, step_loader, train_loader)
from .subsets import SubsetDataset, check_fraction, dataset_labels, labelled_split, labelled_subset
from .tokenize import TOKENIZERS, ByteTokenizer, create_tokenizer, list_tokenizers

__all__ = ["ViewAugment", "ViewSpec", "eval_transform", "multicrop_specs", "view_specs", "DataError", "DatasetInfo",
           "ImageFolderDataset", "TensorImageDataset", "build_dataset", "list_datasets", "load_image",
           "register_dataset", "EvalCollate", "SkipCounter", "StepBatchSampler", "ViewCollate",
           "eval_loader", "train_loader", "PairCollate", "batch_len", "step_loader", "own_generator", "TOKENIZERS", "ByteTokenizer",
           "create_tokenizer", "list_tokenizers", "ZippedLoader", "SubsetDataset", "check_fraction", "dataset_labels",
           "labelled_split", "labelled_subset", "MASK_KINDS", "MaskError", "MaskGenerator", "beit_block_mask",
           "beit_num_masked", "inverse_block_mask"]
