"""The library the jobs are made of: storage, data, training, evaluation, tracking."""
