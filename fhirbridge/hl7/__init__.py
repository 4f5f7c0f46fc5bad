"""HL7 v2 ADT intake: MLLP listener, message decoding, ADT → patient events, ACK building.

HL7 v2.5.1 Chapter 2 (control, ACK), Chapter 3 (ADT) and Appendix C (MLLP); v2.3 to v2.8 read.
"""

from fhirbridge.hl7.ack import AckDecision, build_ack, encode_ack
from fhirbridge.hl7.adt import (
    CX,
    AdtEvent,
    Event,
    IdentifierChange,
    MergePair,
    OtherEvent,
    ParsedMessage,
    Patient,
    PatientMerge,
    PatientUpsert,
    PersonName,
    parse_adt,
)
from fhirbridge.hl7.message import MessageHeader, MessageRejected, decode_message
from fhirbridge.hl7.mllp import Handler, MLLPServer

__all__ = [
    "CX", "AckDecision", "AdtEvent", "Event", "Handler", "IdentifierChange", "MLLPServer",
    "MergePair", "MessageHeader", "MessageRejected", "OtherEvent", "ParsedMessage", "Patient",
    "PatientMerge", "PatientUpsert", "PersonName", "build_ack", "decode_message",
    "encode_ack", "parse_adt",
]
