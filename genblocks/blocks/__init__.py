"""Small parts, each usable alone: ops, nn layers, distributions, bijectors, schedules, samplers."""
