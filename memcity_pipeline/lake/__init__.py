"""The lake: the table registry (names, schemas, scopes, locations), table IO and locks, and the
one "rebuild what changed, drop what left" helper every incremental stage uses."""
