"""Hooks into training frameworks that record what a pipeline-parallel job actually runs."""
