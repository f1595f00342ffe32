"""Framework-free core: profiles, schedules and DAGs, frequency plans, and the exact simulator.

Nothing here imports torch or lightning.
"""
