"""`duban demo`: the 2017–2018 programme for the five counties, played in simulated time.

- ``story.yaml``: the story as data, step by step (package data);
- :mod:`services.demo.script`: its typed loader and the submission bodies the runner posts;
- :mod:`services.demo.view`: the live terminal view (pure rich renderables);
- :mod:`services.demo.runner`: plays the story against the real services over NATS.
"""
