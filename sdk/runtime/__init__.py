"""Serving a verified package with onnxruntime: decoding, preprocessing, prediction.

Never imports torch. ``Predictor`` is the public entry point.
"""

from sourcefree.runtime.predictor import AUDetector as AUDetector
from sourcefree.runtime.predictor import FacePrediction as FacePrediction
from sourcefree.runtime.predictor import Prediction as Prediction
from sourcefree.runtime.predictor import Predictor as Predictor

__all__ = ["AUDetector", "FacePrediction", "Prediction", "Predictor"]
