"""Peers: the field's reference attribution methods run on the project's model through their own libraries.

- ``kronfluence_peer``: EK-FAC influence functions (kronfluence), factors over the DiT's linear layers;
- ``trak_peer``: TRAK and D-TRAK (traker, with its CPU projector);
- ``unlearning-ekfac`` (in ``stage``): Eq. 2 with the EK-FAC preconditioner (``musicattr.attribution.ekfac``), Eq. 1.

Each writes the standard scores table (``musicattr.attribution.scores_table``) per query of a ``musicattr compare``
run, at ``queries/{query_id}/<peer>/scores.parquet``; ``musicattr.peers.methods`` registers them.
Sign convention everywhere: larger score = more credit (the training item helps the query: as Eq. 1's tau).
"""
