"""SecAgg+ secure aggregation (Bonawitz et al. 2017; Bell et al. 2020) on Flower's Message API.

The server learns the sum of the surviving sites' updates and nothing else about any one of them.

Pure maths, property-tested (tests/test_secagg_maths.py):
- ``keys``     per-round X25519 key pairs, HKDF-SHA256 key derivation, AES-256-GCM for shares;
- ``shamir``   t-of-n secret sharing of 256-bit secrets over GF(2^521 − 1);
- ``masking``  masks expanded from 256-bit seeds by AES-128-CTR, added in the ring Z_{2^bits};
- ``quantise`` clipped, weighted fixed-point updates in the ring, and back to a mean;
- ``graph``    the SecAgg+ neighbour graph and the reconstruction threshold.

Thin stateful halves (tests/test_secagg_protocol.py): ``client.SiteSecAgg`` (one site, one round,
kept in ``context.state`` between messages) and ``server.ServerSecAgg`` (one round on the server).
``protocol`` names the stages and what they carry; ``records`` puts them on the wire as Flower
records; ``layout`` maps model weights to the flat vector. The Flower glue lives in
``clients/secagg.py`` (the ClientApp's ``train.secagg_*`` actions) and ``server/secagg_round.py``.
"""
