"""The training stage: the published recipe (optimizer groups, schedule, mixup, random erasing), the
loop each Ray Train worker runs (`loop`) and the driver that starts it (`driver`). Imports
`pipeline.data`, `pipeline.tracking` and `model`."""
