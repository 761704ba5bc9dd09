"""Processes that do the work: the Civitai client, the download of one job, the worker and updater shells."""
