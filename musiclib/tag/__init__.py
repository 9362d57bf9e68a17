"""The tags stage: the chosen probes applied to the catalog, and the tools around the tags.

``tags`` (tag rows, the tag job's config, the query tool), ``tag_table`` (the Apache Iceberg table),
``suggest`` (what to label next), ``index`` (the nearest-neighbour index and its file) and ``neighbors``
(the index dataset, nearest tracks, seeding a new tag).
"""
