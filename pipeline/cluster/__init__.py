"""The Ray cluster: connecting to it (`connect`) and submitting jobs to it (`submit`). Imports
`pipeline.config` only."""
