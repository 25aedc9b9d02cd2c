"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 06:47:51.879510
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('channels',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('private', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('max_events', sa.Integer(), nullable=True),
    sa.Column('max_age_seconds', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('pruned_through', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    schema='public'
    )
    op.create_table('users',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.Text(), nullable=False),
    sa.Column('is_admin', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username'),
    schema='public'
    )
    op.create_table('channel_members',
    sa.Column('channel_id', sa.BigInteger(), nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['channel_id'], ['public.channels.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['public.users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('channel_id', 'user_id'),
    schema='public'
    )
    op.create_index(op.f('ix_channel_members_user_id'), 'channel_members', ['user_id'], unique=False, schema='public')
    op.create_table('events',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('channel_id', sa.BigInteger(), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), server_default=sa.text('clock_timestamp()'), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['channel_id'], ['public.channels.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    schema='public'
    )
    op.create_index('ix_events_channel_id_id', 'events', ['channel_id', 'id'], unique=False, schema='public')
    op.create_index('ix_events_published_at', 'events', ['published_at'], unique=False, schema='public')
    op.create_index('uq_events_channel_idempotency_key', 'events', ['channel_id', 'idempotency_key'], unique=True, postgresql_where=sa.text('idempotency_key IS NOT NULL'), schema='public')
    op.create_table('subscriptions',
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('channel_id', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['channel_id'], ['public.channels.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['public.users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'channel_id'),
    schema='public'
    )
    op.create_index(op.f('ix_subscriptions_channel_id'), 'subscriptions', ['channel_id'], unique=False, schema='public')


def downgrade() -> None:
    op.drop_index(op.f('ix_subscriptions_channel_id'), table_name='subscriptions', schema='public')
    op.drop_table('subscriptions', schema='public')
    op.drop_index('uq_events_channel_idempotency_key', table_name='events', postgresql_where=sa.text('idempotency_key IS NOT NULL'), schema='public')
    op.drop_index('ix_events_published_at', table_name='events', schema='public')
    op.drop_index('ix_events_channel_id_id', table_name='events', schema='public')
    op.drop_table('events', schema='public')
    op.drop_index(op.f('ix_channel_members_user_id'), table_name='channel_members', schema='public')
    op.drop_table('channel_members', schema='public')
    op.drop_table('users', schema='public')
    op.drop_table('channels', schema='public')
