//! Who is speaking: the reviewer of a review decision, the voter of a vote and the actor of an
//! intent, bound to the NATS identity that sent the request rather than taken from its JSON.
//!
//! The NATS server names the sender through the subject: `governance.review.decide.<name>`,
//! `unified_logic.vote.<name>` and `htm.intent.submit.<name>` are per-identity subjects that
//! `nats.conf` lets only user `<name>` publish to (docs/security.md). On such a subject the
//! body's `reviewer` / `voter` / `actor` may be left out (it is the sender) and, when given, must
//! name the sender: anything else is refused with 403 `identity_mismatch`.
//!
//! On the plain contract subjects the server does not name the sender, so the field is a claim.
//! It is accepted unless it names one of `governance.bound_identities` (or that list holds `*`):
//! a bound name speaks only on its own subject, and a plain request naming it is refused with 403
//! `identity_required`. Who may publish the plain subjects at all is `nats.conf`'s to say.
//!
//! Pure code: no I/O.

use bulwark_common::api::ApiError;

/// A reviewer, voter or actor name that disagrees with the sending identity.
pub const IDENTITY_MISMATCH: &str = "identity_mismatch";
/// A bound name claimed on a plain subject.
pub const IDENTITY_REQUIRED: &str = "identity_required";
/// Entry of `governance.bound_identities` that binds every name.
pub const BIND_ALL: &str = "*";

/// Who sent a request, as far as the server vouches for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender<'a> {
    /// The plain contract subject: the server does not say who sent it.
    Unnamed,
    /// A per-identity subject `<plain>.<name>`: only user `<name>` may publish to it.
    Identity(&'a str),
}

impl<'a> Sender<'a> {
    /// The sender of a request that arrived on `subject`, served as `plain` and `plain.*`.
    pub fn of(subject: &'a str, plain: &str) -> Sender<'a> {
        match subject
            .strip_prefix(plain)
            .and_then(|rest| rest.strip_prefix('.'))
        {
            Some(name) if !name.is_empty() => Sender::Identity(name),
            _ => Sender::Unnamed,
        }
    }
}

/// The field a request names its speaker in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `reviewer` of `governance.review.decide`.
    Reviewer,
    /// `voter` of `unified_logic.vote`.
    Voter,
    /// `actor` of `htm.intent.submit`.
    Actor,
}

impl Role {
    /// The JSON field.
    pub fn field(self) -> &'static str {
        match self {
            Role::Reviewer => "reviewer",
            Role::Voter => "voter",
            Role::Actor => "actor",
        }
    }

    /// The plain contract subject of this role's requests.
    pub fn plain_subject(self) -> &'static str {
        use bulwark_common::subjects;
        match self {
            Role::Reviewer => subjects::REVIEW_DECIDE,
            Role::Voter => subjects::VOTE,
            Role::Actor => subjects::INTENT_SUBMIT,
        }
    }
}

/// True when `name` may only speak on its own subject.
pub fn is_bound(name: &str, bound: &[String]) -> bool {
    bound.iter().any(|b| b == BIND_ALL || b == name)
}

/// The speaker of a request from `sender` whose body names `claimed` (absent or empty when the
/// field was left out), or why it is refused. `Ok(None)` means: no name given on a plain
/// subject; the caller's own validation reports the missing field.
pub fn bind(
    role: Role,
    claimed: Option<&str>,
    sender: Sender<'_>,
    bound: &[String],
) -> Result<Option<String>, ApiError> {
    let field = role.field();
    let claimed = claimed.filter(|c| !c.is_empty());
    match (sender, claimed) {
        (Sender::Identity(me), None) => Ok(Some(me.to_owned())),
        (Sender::Identity(me), Some(c)) if c == me => Ok(Some(me.to_owned())),
        (Sender::Identity(me), Some(c)) => Err(ApiError::forbidden(
            IDENTITY_MISMATCH,
            format!(
                "{field} {c:?} is not the NATS identity {me:?} that sent this request on {}.{me}; \
                 leave {field} out or give {me:?}",
                role.plain_subject()
            ),
        )),
        (Sender::Unnamed, Some(c)) if is_bound(c, bound) => Err(ApiError::forbidden(
            IDENTITY_REQUIRED,
            format!(
                "{field} {c:?} is bound to its NATS identity (governance.bound_identities): \
                 only user {c:?} may speak for it, on {}.{c}",
                role.plain_subject()
            ),
        )),
        (Sender::Unnamed, claimed) => Ok(claimed.map(str::to_owned)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_sender_is_the_last_token_of_a_per_identity_subject() {
        assert_eq!(
            Sender::of("unified_logic.vote", "unified_logic.vote"),
            Sender::Unnamed
        );
        assert_eq!(
            Sender::of("unified_logic.vote.guardian", "unified_logic.vote"),
            Sender::Identity("guardian")
        );
        assert_eq!(
            Sender::of("unified_logic.voter", "unified_logic.vote"),
            Sender::Unnamed
        );
    }

    #[test]
    fn a_per_identity_subject_binds_the_speaker() {
        let me = Sender::Identity("alice");
        assert_eq!(
            bind(Role::Reviewer, None, me, &[]).expect("ok"),
            Some("alice".into())
        );
        assert_eq!(
            bind(Role::Reviewer, Some(""), me, &[]).expect("ok"),
            Some("alice".into())
        );
        assert_eq!(
            bind(Role::Reviewer, Some("alice"), me, &[]).expect("ok"),
            Some("alice".into())
        );
        let err = bind(Role::Reviewer, Some("bob"), me, &[]).expect_err("mismatch");
        assert_eq!((err.status, err.code.as_str()), (403, IDENTITY_MISMATCH));
        assert!(
            err.message.contains("\"bob\"") && err.message.contains("\"alice\""),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("governance.review.decide.alice"),
            "{}",
            err.message
        );
    }

    #[test]
    fn plain_subjects_refuse_bound_names_only() {
        let bound = names(&["guardian"]);
        assert_eq!(
            bind(Role::Voter, Some("steward"), Sender::Unnamed, &bound).expect("unbound"),
            Some("steward".into())
        );
        let err =
            bind(Role::Voter, Some("guardian"), Sender::Unnamed, &bound).expect_err("bound name");
        assert_eq!((err.status, err.code.as_str()), (403, IDENTITY_REQUIRED));
        assert!(
            err.message.contains("unified_logic.vote.guardian"),
            "{}",
            err.message
        );
        let all = names(&["*"]);
        assert!(bind(Role::Actor, Some("anyone"), Sender::Unnamed, &all).is_err());
        assert_eq!(
            bind(Role::Actor, None, Sender::Unnamed, &all).expect("left to validation"),
            None
        );
        // A per-identity subject is never refused for being bound: it is the bound path.
        assert!(
            bind(
                Role::Voter,
                Some("guardian"),
                Sender::Identity("guardian"),
                &all
            )
            .is_ok()
        );
    }
}
