//! The DPS request and response messages (protocol digest §5.3–§5.5), built from and into
//! AMQP message sections with `fe2o3-amqp-types`.

use bytes::{BufMut, BytesMut};
use fe2o3_amqp_types::definitions::{AmqpError, Error as AmqpErrorBody, ErrorCondition, Fields};
use fe2o3_amqp_types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp_types::messaging::{
    ApplicationProperties, Body, Data, MessageId, Properties, Rejected,
};
use fe2o3_amqp_types::primitives::{OrderedMap, SimpleValue, Symbol, Value};
use serde_amqp::primitives::Binary;

/// `iotdps-operation-type` of a registration request.
pub const OP_REGISTER: &str = "iotdps-register";
/// `iotdps-operation-type` of an operation-status poll.
pub const OP_STATUS: &str = "iotdps-get-operationstatus";

/// Application-property keys.
pub mod keys {
    /// The operation requested (and echoed on the answer).
    pub const OPERATION_TYPE: &str = "iotdps-operation-type";
    /// The operation polled.
    pub const OPERATION_ID: &str = "iotdps-operation-id";
    /// `true` asks for a new assignment even when one exists.
    pub const FORCE_REGISTRATION: &str = "iotdps-forceRegistration";
    /// The registration status, on answers.
    pub const STATUS: &str = "iotdps-status";
    /// Seconds to wait (Node, Java, C SDK).
    pub const RETRY_AFTER: &str = "retry-after";
    /// Seconds to wait (C# reads only this spelling).
    pub const RETRY_AFTER_CAPITALIZED: &str = "Retry-After";
}

/// What a request message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `iotdps-register`.
    Register,
    /// `iotdps-get-operationstatus` with its `iotdps-operation-id` (`None`: missing).
    Status(Option<String>),
    /// Missing or unknown `iotdps-operation-type`.
    Unknown(Option<String>),
}

/// A request message, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The operation.
    pub operation: Operation,
    /// `iotdps-forceRegistration` (boolean, or the string `"true"`).
    pub force_registration: bool,
    /// `properties.correlation-id`, copied to the answer as is.
    pub correlation_id: Option<MessageId>,
    /// The data sections, concatenated (the JSON `DeviceRegistration`); empty for other bodies.
    pub body: Vec<u8>,
}

/// Decode a transfer's message bytes.
pub fn parse_request(payload: &[u8]) -> Result<Request, serde_amqp::Error> {
    crate::frame::check_encoding(payload)?;
    let reader = serde_amqp::read::SliceReader::new(payload);
    let msg = Body::<Value>::decode_message_from_reader(reader)?;
    let props = msg.application_properties.map(|a| a.0).unwrap_or_default();
    let text = |k: &str| match props.get(k) {
        Some(SimpleValue::String(s)) => Some(s.clone()),
        Some(SimpleValue::Symbol(s)) => Some(s.0.clone()),
        _ => None,
    };
    let operation = match text(keys::OPERATION_TYPE) {
        Some(t) if t == OP_REGISTER => Operation::Register,
        Some(t) if t == OP_STATUS => Operation::Status(text(keys::OPERATION_ID)),
        other => Operation::Unknown(other),
    };
    let force_registration = match props.get(keys::FORCE_REGISTRATION) {
        Some(SimpleValue::Bool(b)) => *b,
        Some(SimpleValue::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    };
    let body = match msg.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        _ => Vec::new(),
    };
    Ok(Request {
        operation,
        force_registration,
        correlation_id: msg.properties.and_then(|p| p.correlation_id),
        body,
    })
}

/// Encode a response message: `properties.correlation-id` (when the request had one), the
/// application properties (`iotdps-operation-type` echoed, `iotdps-status`, and `retry-after`
/// plus `Retry-After` when given) and one data section with `json`.
pub fn response(
    correlation_id: Option<MessageId>,
    operation_type: Option<&str>,
    status: Option<&str>,
    retry_after: Option<u32>,
    json: &[u8],
) -> Result<Vec<u8>, serde_amqp::Error> {
    let mut out = BytesMut::new();
    if let Some(c) = correlation_id {
        let props = Properties {
            correlation_id: Some(c),
            ..Default::default()
        };
        out.put_slice(&serde_amqp::to_vec(&props)?);
    }
    let mut app: OrderedMap<String, SimpleValue> = OrderedMap::new();
    if let Some(op) = operation_type {
        app.insert(keys::OPERATION_TYPE.into(), SimpleValue::String(op.into()));
    }
    if let Some(s) = status {
        app.insert(keys::STATUS.into(), SimpleValue::String(s.into()));
    }
    if let Some(s) = retry_after {
        // A string, as the captured exchanges show the Node SDK reading it (the C SDK takes a
        // string or an int; C# parses the text).
        app.insert(keys::RETRY_AFTER.into(), SimpleValue::String(s.to_string()));
        app.insert(
            keys::RETRY_AFTER_CAPITALIZED.into(),
            SimpleValue::String(s.to_string()),
        );
    }
    out.put_slice(&serde_amqp::to_vec(&ApplicationProperties(app))?);
    out.put_slice(&serde_amqp::to_vec(&Data(Binary::from(json.to_vec())))?);
    Ok(out.to_vec())
}

/// The condition of a rejected request, by HTTP-equivalent status (digest §5.5).
pub fn condition_for(status: u16) -> ErrorCondition {
    match status {
        401 | 403 => ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
        404 => ErrorCondition::AmqpError(AmqpError::NotFound),
        429 => ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled")),
        s if s >= 500 => ErrorCondition::AmqpError(AmqpError::InternalError),
        _ => ErrorCondition::AmqpError(AmqpError::InvalidField),
    }
}

/// The `rejected` outcome of a failed request: the condition for `status`, the error JSON as
/// the description (C# parses it), and `Retry-After` / `retry-after` in `info` when given.
pub fn rejected(status: u16, error_json: String, retry_after: Option<u32>) -> Rejected {
    let info = retry_after.map(|s| {
        let mut f: Fields = OrderedMap::new();
        f.insert(
            Symbol::from(keys::RETRY_AFTER_CAPITALIZED),
            Value::String(s.to_string()),
        );
        f.insert(
            Symbol::from(keys::RETRY_AFTER),
            Value::String(s.to_string()),
        );
        Box::new(f)
    });
    Rejected {
        error: Some(AmqpErrorBody {
            condition: condition_for(status),
            description: Some(error_json),
            info,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{AmqpValue, Message};

    fn encode_request(
        props: Vec<(&str, SimpleValue)>,
        correlation: Option<&str>,
        body: Body<Value>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(c) = correlation {
            out.extend(
                serde_amqp::to_vec(&Properties {
                    correlation_id: Some(MessageId::String(c.into())),
                    ..Default::default()
                })
                .unwrap(),
            );
        }
        let mut app = OrderedMap::new();
        for (k, v) in props {
            app.insert(k.to_string(), v);
        }
        out.extend(serde_amqp::to_vec(&ApplicationProperties(app)).unwrap());
        match body {
            Body::Data(b) => {
                for d in b.iter() {
                    out.extend(serde_amqp::to_vec(d).unwrap())
                }
            }
            Body::Value(v) => out.extend(serde_amqp::to_vec(&v).unwrap()),
            _ => {}
        }
        out
    }

    #[test]
    fn the_node_register_message_parses() {
        // device-node-amqp-sym-assigned.json: the register TRANSFER.
        let raw = encode_request(
            vec![
                (
                    keys::OPERATION_TYPE,
                    SimpleValue::String(OP_REGISTER.into()),
                ),
                (keys::FORCE_REGISTRATION, SimpleValue::Bool(false)),
            ],
            Some("3dff0d9d-f45e-4f89-9ce3-015af3e6a8a2"),
            Body::Data(
                vec![Data(Binary::from(
                    br#"{"registrationId":"sym-node-amqp"}"#.to_vec(),
                ))]
                .into(),
            ),
        );
        let r = parse_request(&raw).unwrap();
        assert_eq!(r.operation, Operation::Register);
        assert!(!r.force_registration);
        assert_eq!(
            r.correlation_id,
            Some(MessageId::String(
                "3dff0d9d-f45e-4f89-9ce3-015af3e6a8a2".into()
            ))
        );
        assert_eq!(r.body, br#"{"registrationId":"sym-node-amqp"}"#);
    }

    #[test]
    fn polls_carry_the_operation_id_and_any_body() {
        // C# polls with an amqp-value body; it is ignored.
        let raw = encode_request(
            vec![
                (keys::OPERATION_TYPE, SimpleValue::String(OP_STATUS.into())),
                (keys::OPERATION_ID, SimpleValue::String("4.abc".into())),
                (keys::FORCE_REGISTRATION, SimpleValue::String("TRUE".into())),
            ],
            None,
            Body::Value(AmqpValue(Value::String(OP_STATUS.into()))),
        );
        let r = parse_request(&raw).unwrap();
        assert_eq!(r.operation, Operation::Status(Some("4.abc".into())));
        assert!(r.force_registration);
        assert_eq!(r.correlation_id, None);
        assert!(r.body.is_empty());
        let raw = encode_request(vec![], None, Body::Empty);
        assert_eq!(
            parse_request(&raw).unwrap().operation,
            Operation::Unknown(None)
        );
    }

    #[test]
    fn a_response_is_one_data_section_with_the_correlation_id() {
        let raw = response(
            Some(MessageId::String("c-1".into())),
            Some(OP_REGISTER),
            Some("assigning"),
            Some(3),
            br#"{"status":"assigning"}"#,
        )
        .unwrap();
        let msg =
            Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(&raw))
                .unwrap();
        let Message {
            properties,
            application_properties,
            body,
            ..
        } = msg;
        assert_eq!(
            properties.unwrap().correlation_id,
            Some(MessageId::String("c-1".into()))
        );
        let app = application_properties.unwrap().0;
        assert_eq!(
            app.get(keys::STATUS),
            Some(&SimpleValue::String("assigning".into()))
        );
        assert_eq!(
            app.get(keys::RETRY_AFTER),
            Some(&SimpleValue::String("3".into()))
        );
        assert_eq!(
            app.get(keys::RETRY_AFTER_CAPITALIZED),
            Some(&SimpleValue::String("3".into()))
        );
        let Body::Data(data) = body else {
            panic!("data body expected")
        };
        assert_eq!(data.len(), 1);
        assert_eq!(&data[0].0[..], br#"{"status":"assigning"}"#);
        // No correlation id in, none out (the C SDK).
        let raw = response(None, None, None, None, b"{}").unwrap();
        let msg =
            Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(&raw))
                .unwrap();
        assert!(msg.properties.is_none());
    }

    #[test]
    fn rejections_carry_condition_description_and_retry_after() {
        let r = rejected(429, "{\"errorCode\":429001}".into(), Some(3));
        let e = r.error.unwrap();
        assert_eq!(
            e.condition,
            ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled"))
        );
        assert_eq!(e.description.as_deref(), Some("{\"errorCode\":429001}"));
        let info = e.info.unwrap();
        assert_eq!(
            info.get(&Symbol::from("retry-after")),
            Some(&Value::String("3".into()))
        );
        assert_eq!(
            info.get(&Symbol::from("Retry-After")),
            Some(&Value::String("3".into()))
        );
        assert_eq!(
            condition_for(401),
            ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)
        );
        assert_eq!(
            condition_for(404),
            ErrorCondition::AmqpError(AmqpError::NotFound)
        );
        assert_eq!(
            condition_for(503),
            ErrorCondition::AmqpError(AmqpError::InternalError)
        );
        assert_eq!(
            condition_for(400),
            ErrorCondition::AmqpError(AmqpError::InvalidField)
        );
        assert!(rejected(404, "{}".into(), None)
            .error
            .unwrap()
            .info
            .is_none());
    }
}
