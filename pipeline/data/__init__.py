"""The data stage: storage (local and S3), annotations, class folders and image-frame folders, video probe
and transcode, `prepare`, the manifest, the official datasets' class lists, decoding, frame sampling,
transforms and RandAugment, the Ray Data clip datasets, and the synthetic videos of the demo and tests.
Imports `pipeline.config` only (and PyAV, pyarrow, Ray Data)."""
