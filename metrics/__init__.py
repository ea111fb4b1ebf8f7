"""Image-quality metrics on NVIDIA's FID Inception network: FID, Inception Score, precision/recall."""
from metrics.detector import load_detector, read_detector_state_dict
from metrics.evaluate import evaluate_generator
from metrics.feature_stats import (compute_feature_stats, dataset_feature_stats, load_ref_stats, open_image_set,
                                   save_ref_stats)
from metrics.inception import InceptionV3, preprocess
from metrics.scores import frechet_distance, inception_score, precision_recall
