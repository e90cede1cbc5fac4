"""The names a command offers that are not a run's config (config.py holds those: recipes, augmentations, ...).

Here, not in the modules that act on them, because those import torch or optuna and the CLI builds its parser
without them (start-up time); each module imports its tuple from here.
"""

BACKENDS = ("auto", "torch", "onnx")  # predict.Predictor and serve: auto = onnx when RUN/model.onnx exists
OPERATING_POINTS = ("default", "youden", "sensitivity")  # evaluate: how calibration.json names its thresholds
CAM_METHODS = ("gradcam", "gradcam++", "eigencam")  # explain.METHODS, the pytorch-grad-cam class of each
PRUNERS = ("median", "hyperband", "none")  # tune: Optuna's pruner of unpromising trials
PREDICTION_FORMATS = ("csv", "json", "jsonl")  # predict --format: rows as CSV, one JSON document, or a line each
CV_FOLDS = 5  # cv: K of grouped K-fold cross-validation
CV_VAL_SHARE = 0.125  # cv: of each fold's training groups, held out to choose the epoch, temperature and threshold
# data/io.read_image's allow_truncated on the command line: the skip message of a truncated file names it, every
# command that reads images takes it, and whatever loads one says so (io.truncated_loaded)
ALLOW_TRUNCATED_OPTION = "--allow-truncated"
STUDY_AGGREGATES = ("mean", "max")  # study: a study's p(positive) from its images' (evaluate, predict)
# The default of the two, chosen on fracatlas-grouped val with the shipped model (165 studies): study AUC 0.867 with
# the mean against 0.827 with the max, specificity 0.61 against 0.44 at the same sensitivity (docs/VALIDATION.md).
STUDY_AGGREGATE = "mean"
