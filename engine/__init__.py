"""The scheduling engine: requests in with an id, typed outputs back per id, one decoding step at a time."""
