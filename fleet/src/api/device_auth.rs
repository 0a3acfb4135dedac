//! Who calls a device route (bundle downloads, a device's assignment): a device with its own
//! credentials (HTTP Basic: its id and the password the devices file lists for it, the same as for
//! the embedded broker), or the operator with the bearer token. A fleet without a devices file has
//! no device credentials: there the device routes take the operator's token when `api.token` is
//! set, and are open when it is not (development only, like the rest of the API).

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;

use super::ApiState;
use super::constant_time_eq;
use super::error::ApiError;

/// Who made a request to a device route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator's bearer token.
    Operator,
    /// A device of the devices file, by id.
    Device(String),
    /// Nobody in particular: the fleet has neither a devices file nor a token.
    Anyone,
}

/// The caller, or 401 when its credentials are missing or wrong.
pub fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if state.devices.is_none() && state.token.is_none() {
        // Open: whatever a device sends (its broker password, say) is not checked.
        return Ok(Caller::Anyone);
    }
    let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Some(presented) = authorization.and_then(|v| v.strip_prefix("Bearer ")) {
        return match &state.token {
            Some(token) if constant_time_eq(presented.as_bytes(), token.expose().as_bytes()) => {
                Ok(Caller::Operator)
            }
            _ => Err(ApiError::DeviceUnauthorized),
        };
    }
    if let Some(encoded) = authorization.and_then(|v| v.strip_prefix("Basic ")) {
        let Some(devices) = &state.devices else { return Err(ApiError::DeviceUnauthorized) };
        let (device, password) = basic_credentials(encoded).ok_or(ApiError::DeviceUnauthorized)?;
        return match devices.get().authenticate(&device, Some(&password), None) {
            Ok(()) => Ok(Caller::Device(device)),
            Err(failure) => {
                tracing::info!(%device, ?failure, "refused a device's HTTP credentials");
                Err(ApiError::DeviceUnauthorized)
            }
        };
    }
    Err(ApiError::DeviceUnauthorized)
}

/// `base64(ID:PASSWORD)` of `Authorization: Basic …`.
fn basic_credentials(encoded: &str) -> Option<(String, String)> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (device, password) = text.split_once(':')?;
    Some((device.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("robot-1:pass:word");
        assert_eq!(basic_credentials(&encoded), Some(("robot-1".into(), "pass:word".into())));
        assert_eq!(basic_credentials("%%%"), None);
        assert_eq!(basic_credentials(&base64::engine::general_purpose::STANDARD.encode("nocolon")), None);
    }
}
