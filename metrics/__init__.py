"""Image-quality metrics: FID, Inception Score and precision/recall on NVIDIA's FID Inception network,
CLIP-FID (CLIP ViT-B/32) and FD-DINOv2 (DINOv2 ViT-L/14). metrics/ never imports training/: callers hand
it uint8 image batches (fid.py builds datasets, the training loop samples its generator)."""
from metrics.detector import load_detector, read_detector_state_dict
from metrics.evaluate import evaluate_generator
from metrics.feature_stats import compute_feature_stats, rank_chunks
from metrics.inception import InceptionV3, preprocess
from metrics.reference import load_ref_stats, load_reference, save_reference
from metrics.scores import frechet_distance, inception_score, precision_recall
