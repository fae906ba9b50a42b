-- engine schema v2 as created by cfafacd^, postgresql
CREATE TABLE audit (
	id SERIAL NOT NULL, 
	at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	event VARCHAR(64) NOT NULL, 
	host VARCHAR(255), 
	instance VARCHAR(36), 
	migration_id VARCHAR(36), 
	outcome VARCHAR(32) NOT NULL, 
	detail TEXT NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_audit_at ON audit (at);

CREATE INDEX ix_audit_host ON audit (host);

CREATE TABLE command_nonces (
	nonce VARCHAR(64) NOT NULL, 
	keep_until FLOAT NOT NULL, 
	PRIMARY KEY (nonce)
);

CREATE INDEX ix_command_nonces_keep_until ON command_nonces (keep_until);

CREATE TABLE migrations (
	id SERIAL NOT NULL, 
	migration_id VARCHAR(36) NOT NULL, 
	instance_uuid VARCHAR(36) NOT NULL, 
	source VARCHAR(255) NOT NULL, 
	dest VARCHAR(255) NOT NULL, 
	generation BIGINT NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	deadline TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	error TEXT, 
	PRIMARY KEY (id), 
	UNIQUE (migration_id)
);

CREATE INDEX ix_migrations_instance_uuid ON migrations (instance_uuid);

CREATE INDEX ix_migrations_state ON migrations (state);

CREATE TABLE nonces (
	id SERIAL NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	nonce VARCHAR(128) NOT NULL, 
	purpose VARCHAR(32) NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	used BOOLEAN NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (nonce)
);

CREATE INDEX ix_nonces_expires_at ON nonces (expires_at);

CREATE INDEX ix_nonces_host ON nonces (host);

CREATE TABLE policies (
	id SERIAL NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	bank VARCHAR(16) NOT NULL, 
	pcrs JSON NOT NULL, 
	description TEXT NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);

CREATE TABLE schema_version (
	id SERIAL NOT NULL, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE vtpcms (
	id SERIAL NOT NULL, 
	instance_uuid VARCHAR(36) NOT NULL, 
	vtpcm_id VARCHAR(64) NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	generation BIGINT NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	migration_id VARCHAR(36), 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (instance_uuid)
);

CREATE INDEX ix_vtpcms_host ON vtpcms (host);

CREATE TABLE hosts (
	id SERIAL NOT NULL, 
	name VARCHAR(255) NOT NULL, 
	ak_public BYTEA NOT NULL, 
	ak_name BYTEA NOT NULL, 
	kem_public BYTEA NOT NULL, 
	kem_name BYTEA NOT NULL, 
	ek_certificate BYTEA, 
	command_public BYTEA, 
	status VARCHAR(16) NOT NULL, 
	policy_name VARCHAR(255), 
	enrolled_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	approved_at TIMESTAMP WITHOUT TIME ZONE, 
	PRIMARY KEY (id), 
	UNIQUE (name), 
	FOREIGN KEY(policy_name) REFERENCES policies (name)
);

CREATE TABLE clock_states (
	host VARCHAR(255) NOT NULL, 
	clock BIGINT NOT NULL, 
	reset_count BIGINT NOT NULL, 
	restart_count BIGINT NOT NULL, 
	PRIMARY KEY (host), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE TABLE verdicts (
	host VARCHAR(255) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	attested_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (host), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE INDEX ix_verdicts_expires_at ON verdicts (expires_at);
