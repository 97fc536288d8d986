"""The label store, importing no torch: schema and format, shard writing and packing, repair and
verification, objects on disk and at URLs, the cache, the lease, locks and durable local writes."""
