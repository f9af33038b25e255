"""The benchmark platform: model keys, taxonomy, reference leaderboard, results store,
leaderboard pages, model zoo, importers, ``benchmark()`` and grid runs."""
