"""HTTP routes: jobs, data, inference, models, galleries, identify, health, the web page."""
