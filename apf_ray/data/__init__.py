"""Datasets (numpy arrays in memory) and partitioners that split them among clients."""

from apf_ray.data.loaders import DATASETS, Dataset, load_dataset
from apf_ray.data.partition import (
    PARTITIONERS,
    DirichletPartitioner,
    IidPartitioner,
    NaturalPartitioner,
    Partitioner,
    ShardPartitioner,
    label_histogram,
    make_partitioner,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "DirichletPartitioner",
    "IidPartitioner",
    "NaturalPartitioner",
    "Partitioner",
    "ShardPartitioner",
    "label_histogram",
    "load_dataset",
    "make_partitioner",
]
