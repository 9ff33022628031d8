"""onnxcc calibration: feed sources, streaming observers, quantization maths and the
calibration table (the onnxruntime-running collector arrives with the quantize pass)."""

from .data import (Feed, Preprocess, Source, as_feed, as_source, feeds_source, folder_source, image_source,
                   load_preprocess, npz_source, random_source, signature, split, test_data_source)
from .observers import DEFAULT_BINS, HistogramObserver, MinMaxObserver, observer_from_dict
from .scales import (METHODS, MIN_SCALE, QuantParams, dequantize, params_from_range, qrange, quantize,
                     select_range, weight_params)
from .table import CalibrationTable, TableEntry, entry_from_observer

__all__ = [
    "Feed", "Preprocess", "Source", "as_feed", "as_source", "feeds_source", "folder_source", "image_source",
    "load_preprocess", "npz_source", "random_source", "signature", "split", "test_data_source",
    "DEFAULT_BINS", "HistogramObserver", "MinMaxObserver", "observer_from_dict",
    "METHODS", "MIN_SCALE", "QuantParams", "dequantize", "params_from_range", "qrange", "quantize",
    "select_range", "weight_params",
    "CalibrationTable", "TableEntry", "entry_from_observer",
]

from .gram import FeatureLayout, FeatureStatsObserver, InputStats  # noqa: E402 - pruning's statistics

__all__ += ["FeatureLayout", "FeatureStatsObserver", "InputStats"]
