"""The framework-free training runtime shared by the Lightning and Accelerate integrations."""
