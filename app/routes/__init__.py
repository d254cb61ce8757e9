"""HTTP routes: jobs, inference, models, health."""
