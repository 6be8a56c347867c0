"""Merge methods: each is one module here plus one YAML in ``conf/method/`` (tests check that every class a YAML
targets is exported here: :mod:`mergelab.methods.registry`)."""

from mergelab.methods.adamerging import AdaMerging
from mergelab.methods.awd import AWD
from mergelab.methods.base import MergeMethod, TaskVectorMethod
from mergelab.methods.breadcrumbs import Breadcrumbs
from mergelab.methods.consensus import Consensus
from mergelab.methods.dare import DARE
from mergelab.methods.della import DELLA
from mergelab.methods.fisher import FisherMerging
from mergelab.methods.isotropic import IsoC, IsoCTS
from mergelab.methods.karcher import KarcherMean
from mergelab.methods.magnitude_pruned_ta import MagnitudePrunedTA
from mergelab.methods.metagpt import MetaGPT
from mergelab.methods.model_stock import ModelStock
from mergelab.methods.nearswap import NearSwap
from mergelab.methods.regmean import RegMean
from mergelab.methods.sce import SCE
from mergelab.methods.slerp import SLERP
from mergelab.methods.task_arithmetic import TaskArithmetic
from mergelab.methods.task_singular_vectors import TSVM
from mergelab.methods.ties import TIES
from mergelab.methods.weight_averaging import WeightAveraging

__all__ = [
    "AWD",
    "DARE",
    "DELLA",
    "SCE",
    "SLERP",
    "TIES",
    "TSVM",
    "AdaMerging",
    "Breadcrumbs",
    "Consensus",
    "FisherMerging",
    "IsoC",
    "IsoCTS",
    "KarcherMean",
    "MagnitudePrunedTA",
    "MergeMethod",
    "MetaGPT",
    "ModelStock",
    "NearSwap",
    "RegMean",
    "TaskArithmetic",
    "TaskVectorMethod",
    "WeightAveraging",
]
